"""pii-vault: a PII tokenization vault under KMS envelope encryption."""
