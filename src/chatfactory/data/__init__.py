"""Data: text sources and token shards (sources.py, shards.py, embedded.py), chat data for SFT (chat.py),
comparisons and prompts (preferences.py, comparisons.py), and the embedded tasks with their rubric
(tasks.py, rubric.py)."""
