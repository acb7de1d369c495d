"""ihehub configuration: the home folder, ``ihehub.yaml``, ``channels/*.yaml`` and their validation.

Typical start-up::

    home = home_from_env()
    init_home(home)                         # first start: writes the defaults, never overwrites
    hub = load_home(home)                   # ConfigError lists every problem with file:line
    channels = load_channels(home, Registry(), hub=hub)
"""

from ihehub.config.errors import ConfigError, Problem
from ihehub.config.home import (
    DEFAULT_HOME,
    HOME_ENV,
    home_from_env,
    init_home,
    load_channels,
    load_home,
    validate_home,
)
from ihehub.config.model import (
    ActorsConfig,
    AtnaConfig,
    AuthConfig,
    ChannelConfig,
    DeliveryConfig,
    DestinationConfig,
    DicomActorConfig,
    HttpConfig,
    HubConfig,
    MllpActorConfig,
    RetentionConfig,
    RetryPolicy,
    SourceConfig,
    StoreConfig,
    SyslogActorConfig,
    TlsConfig,
    resolve_database,
)
from ihehub.config.schema import load_schema

__all__ = [
    "DEFAULT_HOME",
    "HOME_ENV",
    "ActorsConfig",
    "AtnaConfig",
    "AuthConfig",
    "ChannelConfig",
    "ConfigError",
    "DeliveryConfig",
    "DestinationConfig",
    "DicomActorConfig",
    "HttpConfig",
    "HubConfig",
    "MllpActorConfig",
    "Problem",
    "RetentionConfig",
    "RetryPolicy",
    "SourceConfig",
    "StoreConfig",
    "SyslogActorConfig",
    "TlsConfig",
    "home_from_env",
    "init_home",
    "load_channels",
    "load_home",
    "load_schema",
    "resolve_database",
    "validate_home",
]
