"""Identity and access: API keys and their store, principals and the authenticator."""
