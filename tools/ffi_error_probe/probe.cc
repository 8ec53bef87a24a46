// Handlers that fail on purpose, each building its error message another
// way, to find which error path a jaxlib turns into a crash instead of a
// Python exception. run.py compiles this file and calls each handler in a
// child process (docs/HOPPER.md, "XLA FFI compatibility", says what was
// found).
#include <sstream>
#include <string>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// The message built with an output string stream.
ffi::Error StreamMessage(ffi::AnyBuffer, ffi::Result<ffi::AnyBuffer>) {
  std::ostringstream os;
  os << "probe: stream message, value " << 42;
  return ffi::Error::InvalidArgument(os.str());
}

// The message built by string concatenation.
ffi::Error StringMessage(ffi::AnyBuffer, ffi::Result<ffi::AnyBuffer>) {
  return ffi::Error::InvalidArgument(std::string("probe: string message, value ") +
                                     std::to_string(42));
}

// A string stream used but the handler succeeds: is it the stream or the
// error return?
ffi::Error StreamNoError(ffi::AnyBuffer, ffi::Result<ffi::AnyBuffer>) {
  std::ostringstream os;
  os << "unused " << 42;
  return os.str().empty() ? ffi::Error::Internal("empty") : ffi::Error::Success();
}

// A literal message: no allocation of ours at all.
ffi::Error LiteralMessage(ffi::AnyBuffer, ffi::Result<ffi::AnyBuffer>) {
  return ffi::Error(ffi::ErrorCode::kInvalidArgument, "probe: literal message");
}

}  // namespace

#define PROBE_HANDLER(name, impl)                                        \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name, impl,                              \
                                ffi::Ffi::Bind()                         \
                                    .Arg<ffi::AnyBuffer>()               \
                                    .Ret<ffi::AnyBuffer>());

PROBE_HANDLER(probe_stream_message, StreamMessage)
PROBE_HANDLER(probe_string_message, StringMessage)
PROBE_HANDLER(probe_stream_no_error, StreamNoError)
PROBE_HANDLER(probe_literal_message, LiteralMessage)
