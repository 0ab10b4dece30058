"""The HTTP data plane: TEI's HTTP API per instance and model, and OpenAI-compatible routes,
served by the multiplexer process on its event loop, over its routing table and channels."""
