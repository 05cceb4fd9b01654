"""The inference engine: pure-Python bookkeeping (request, block pool, KV manager, scheduler) around
one torch model runner. `core.Engine` ties them together: step = schedule -> run -> update."""
