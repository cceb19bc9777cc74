"""Exception hierarchy: every failure a user or operator can cause has a named class."""


class EtcdhaError(Exception):
    """Base of every error etcdha raises on purpose."""


class ConfigError(EtcdhaError):
    """The config file (or a CLI argument) is not what etcdha expects."""


class StoreError(EtcdhaError):
    """Talking to etcd failed."""


class Unavailable(StoreError):
    """etcd could not be reached (or has no leader) within the deadline."""


class AuthError(StoreError):
    """etcd refused our user, password or permissions: retrying cannot help, the operator must act."""


class Conflict(StoreError):
    """A transaction's comparison failed: someone else changed the key first."""


class ActuatorError(EtcdhaError):
    """Starting or stopping a program or an address failed."""
