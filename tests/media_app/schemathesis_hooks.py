"""Loaded by the schemathesis run of test_api_contract.py (``SCHEMATHESIS_HOOKS``), not by pytest.

tus sends its chunks as ``application/offset+octet-stream``, a media type schemathesis cannot
generate by itself: any bytes are a valid chunk, so it gets bytes.
"""

from __future__ import annotations

import schemathesis
from hypothesis import strategies as st

schemathesis.openapi.media_type("application/offset+octet-stream", st.binary(min_size=1, max_size=256))
