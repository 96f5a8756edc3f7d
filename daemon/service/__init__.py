"""The daemon as a service: the supervisor process, the client-facing frontend and the HTTP API."""
