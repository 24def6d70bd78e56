"""Placeholder: workers lands with the control plane issue (see README.md, Status)."""
