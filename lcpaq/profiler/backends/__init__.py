"""Built-in latency backends. Each submodule registers itself; runtimes are imported lazily."""
