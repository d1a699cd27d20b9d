function on_message(msg, ctx)
  counter = (counter or 0) + 1
  ctx:route("count", tostring(counter))
  if ctx.message_id == "tamper" then
    setmetatable(_G, { __index = function() error("tampered") end,
                       __newindex = function() error("tampered") end })
  end
end
