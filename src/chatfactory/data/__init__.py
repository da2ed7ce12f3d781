"""Data: text sources, token shards and loaders (later: chat, comparisons and prompt datasets)."""
