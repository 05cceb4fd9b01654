"""The shared kernel of triphase: what every component agrees on.

At the top: roles and their protobuf map, errors, label keys, block hashes, sampling and grammar
bounds, image limits, performance profiles, and the worker stubs every caller of a worker uses.
Subpackages hold the larger concerns: `security` (mTLS, CA, KV tickets), `models` (model files,
tokenizers, vision settings), `k8s` (API credentials, worker pods) and `process` (lifetimes,
logging, ports, the workers file, shutdown). Every component may import this package; it imports no
other triphase component.
"""
