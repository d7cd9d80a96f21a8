"""The bundle contract: the one layer every other g3n package stands on.

  names.py        bundle, signature and tensor names (defined once)
  manifest.py     manifest.json as a typed schema: one writer, one validating reader, verification
  files.py        atomic writes and sha256
  errors.py       the user-facing error types
  native_logs.py  silencing the C++ libraries' stderr noise

It imports nothing of the project and nothing beyond the standard library, so a phone-side
runner, a packer or a device harness can read a bundle folder with it alone.
"""
