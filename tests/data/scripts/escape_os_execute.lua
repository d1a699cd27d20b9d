-- sandbox escape: os_execute
function on_message(msg, ctx)
  if ctx.message_id == "normal" then return ctx:route("out", msg) end
  os.execute("touch /tmp/radrelay-escape")
end
