-- sandbox escape: os_exit
function on_message(msg, ctx)
  if ctx.message_id == "normal" then return ctx:route("out", msg) end
  os.exit(3)
end
