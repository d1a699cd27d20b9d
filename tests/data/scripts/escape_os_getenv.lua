-- sandbox escape: os_getenv
function on_message(msg, ctx)
  if ctx.message_id == "normal" then return ctx:route("out", msg) end
  ctx:route("out", os.getenv("HOME"))
end
