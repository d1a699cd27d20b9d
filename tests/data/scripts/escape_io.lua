-- sandbox escape: io
function on_message(msg, ctx)
  if ctx.message_id == "normal" then return ctx:route("out", msg) end
  local f = io.open("/etc/passwd")
  ctx:route("out", f:read("a"))
end
