"""etcdha: at most one copy of each service and its VIP, coordinated through etcd."""

__version__ = "0.1.0"
