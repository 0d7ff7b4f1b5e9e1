"""The HTTP API: routes (one module per resource), their dependencies, the request and
response schemas, API keys and the OpenAI-style errors."""
