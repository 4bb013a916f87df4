"""The aggregator: its gRPC service, request checks and durable round store."""
