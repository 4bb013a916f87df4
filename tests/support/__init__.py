"""Helpers shared by the tests: processes, servers, loopback gRPC, reference computations."""
