"""Federated pieces of ``dp_fedlora``: options and plan, data partitions and client schedules, the
client's local step (per mode), aggregation, the server loop, the server's view for the auditor, and
the Flower glue (optional extra ``privaudit[federated]``)."""
