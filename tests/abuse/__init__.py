"""Control-plane abuse run (``python -m tests.abuse.control``) and its helpers."""
