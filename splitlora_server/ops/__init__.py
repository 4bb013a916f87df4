"""Operating the server: certificates, tokens, status, metrics and admin commands."""
