"""Activation policies, CPU/NVMe stores and the copy engine front end."""
