"""iclvsft: in-context learning vs fine-tuning on implicit-pattern tasks (Yin et al., EMNLP 2024 Findings)."""

__version__ = "0.2.0"  # bump whenever a generator's output changes: data folders of another version are refused
