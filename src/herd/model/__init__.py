"""The Llama 4 model. Imports only torch (and herd's plain-Python config)."""
