"""Generated from proto/specdec/v1 by specdec.wire.protos."""
