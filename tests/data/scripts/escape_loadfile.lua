-- sandbox escape: loadfile
function on_message(msg, ctx)
  if ctx.message_id == "normal" then return ctx:route("out", msg) end
  local f = loadfile("/etc/passwd")
end
