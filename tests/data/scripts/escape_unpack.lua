-- sandbox escape: unpack
function on_message(msg, ctx)
  if ctx.message_id == "normal" then return ctx:route("out", msg) end
  return table.unpack({}, 1, 1e8)
end
