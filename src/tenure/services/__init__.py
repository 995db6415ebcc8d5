"""Adapters for the services tenure fails over; they know nothing of etcd."""
