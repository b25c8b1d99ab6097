"""`q3serve bench`: an open-loop load generator for a running server (OpenAI HTTP and gRPC)."""
