-- Shared helpers for the bundled radiology channels (require "radiology").
local M = {}

-- Order priority from the places RIS systems put it: ORC-7.6 (v2.3-2.4),
-- TQ1-9 (v2.5+), OBR-27.6. Returns "STAT", "ASAP" or "ROUTINE".
function M.priority(msg)
  local p = msg:get("ORC-7.6")
  if p == nil or p == "" then p = msg:get("TQ1-9.1") end
  if p == nil or p == "" then p = msg:get("OBR-27.6") end
  p = (p or ""):upper()
  if p == "S" or p == "STAT" then return "STAT" end
  if p == "A" or p == "ASAP" then return "ASAP" end
  return "ROUTINE"
end

-- The accession number: OBR-18 (ORM), IPC-1 (OMI), else the filler order number.
function M.accession(msg)
  for _, path in ipairs({"OBR-18.1", "IPC-1.1", "ORC-3.1", "OBR-3.1"}) do
    local v = msg:get(path)
    if v and v ~= "" and v ~= '""' then return v end
  end
  return nil
end

-- The patient's MRN: the PID-3 repetition typed MR, else the first.
function M.mrn(msg)
  local n = msg:repetitions("PID-3")
  for i = 1, n do
    if msg:get("PID-3[" .. i .. "].5") == "MR" then return msg:get("PID-3[" .. i .. "].1") end
  end
  return msg:get("PID-3.1")
end

return M
