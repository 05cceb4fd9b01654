"""The small shared kernel of triphase: roles, errors, logging set-up.

Every component may import this package; it imports no other triphase component.
"""
