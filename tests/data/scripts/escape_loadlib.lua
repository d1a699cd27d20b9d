-- sandbox escape: loadlib
function on_message(msg, ctx)
  if ctx.message_id == "normal" then return ctx:route("out", msg) end
  local f = package.loadlib("/lib/x86_64-linux-gnu/libc.so.6", "system")
  f("true")
end
