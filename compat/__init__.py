"""The OpenAI wire protocol: parsing requests, building responses, SSE, errors. Knows no backend."""
