"""The chat flow: reading a request, its KV policy and admission, the engine call and the
answer (whole or streamed) back to the client."""
