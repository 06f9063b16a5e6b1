"""Imports every domain's models so that ``metadata`` (Alembic's target) knows every table.

This is the one module in core that names other domains; it is imported only by migrations and tests.
"""

from services.auth import models as _auth  # noqa: F401
from services.control_plane import models as _control  # noqa: F401
from services.control_plane.backups import models as _backups  # noqa: F401
from services.control_plane.clusters import models as _clusters  # noqa: F401
from services.control_plane.keys import models as _keys  # noqa: F401
from services.core import audit as _audit  # noqa: F401
from services.core import mail as _mail  # noqa: F401
from services.core.db import Base

metadata = Base.metadata
