"""Client-site agent: talks to the control plane over HTTP and trains with fedsrd_core."""
