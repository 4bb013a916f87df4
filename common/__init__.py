"""Code shared by the server, the aggregator and the clients. Never imports a role package."""
