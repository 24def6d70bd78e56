"""Services own the transactions; routers and tasks call them with a runtime."""
