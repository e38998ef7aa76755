"""Storage: models, the engine and its transactions, repositories (all SQL lives in repositories)."""
