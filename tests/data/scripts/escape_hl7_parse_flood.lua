-- sandbox escape: hl7_parse_flood
function on_message(msg, ctx)
  if ctx.message_id == "normal" then return ctx:route("out", msg) end
  local big = msg:encode():rep(1000)
  local keep = {}
  for i = 1, 1e6 do keep[i] = hl7.parse(big) end
end
