-- sandbox escape: setmetatable_G
function on_message(msg, ctx)
  if ctx.message_id == "normal" then return ctx:route("out", msg) end
  setmetatable(_G, nil)
  setmetatable(_G, { __index = function(_, k) error("no global " .. k) end })
  ctx:route("out", "tampered")
end
