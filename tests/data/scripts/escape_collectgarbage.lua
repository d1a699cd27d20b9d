-- sandbox escape: collectgarbage
function on_message(msg, ctx)
  if ctx.message_id == "normal" then return ctx:route("out", msg) end
  collectgarbage("stop")
end
