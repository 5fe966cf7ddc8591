"""The keep-alive engine: one process per prepared model shared by every llm command, and an
OpenAI-compatible HTTP endpoint on it (protocol, server, client, http, commands)."""
