-- sandbox escape: route_flood
function on_message(msg, ctx)
  if ctx.message_id == "normal" then return ctx:route("out", msg) end
  for i = 1, 1e6 do ctx:route("out", msg) end
end
