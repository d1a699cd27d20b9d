-- sandbox escape: dofile
function on_message(msg, ctx)
  if ctx.message_id == "normal" then return ctx:route("out", msg) end
  dofile("/etc/passwd")
end
