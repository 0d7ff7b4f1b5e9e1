"""The engine connection: the HTTP client for SGLang, and the embedded engine's command
line, processes and supervisor."""
