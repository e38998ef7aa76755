"""pii-vault's Python package for callers: `piivault.client` (VaultClient, AsyncVaultClient)."""
