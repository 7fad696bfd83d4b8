"""The OpenAI-compatible API: request/response schemas, validation into engine sampling
parameters, and chat-template rendering. Routes and the app live elsewhere and use these."""
