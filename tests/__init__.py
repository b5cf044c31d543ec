"""mmserve's tests; importing mmserve here, before any test module imports grpc, sets gRPC's fork handling."""

import mmserve  # noqa: F401
