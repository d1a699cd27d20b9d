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

local function first(msg, paths)
  for _, path in ipairs(paths) do
    local v = msg:get(path)
    if v and v ~= "" and v ~= '""' then return v end
  end
  return nil
end

-- The order record the engine keeps (orders.keep) from an ORM^O01 or
-- OMI^O23: the fields the study tracker matches on (accession, Study
-- Instance UID, MRN + modality + time) and what routing and results need.
-- patient: what the ADT feed said about the patient (a table), or nil.
function M.order(msg, patient)
  local provider = first(msg, {"ORC-12.1", "OBR-16.1"})
  return {
    accession = M.accession(msg),
    placer_order = first(msg, {"ORC-2.1", "OBR-2.1"}),
    filler_order = first(msg, {"ORC-3.1", "OBR-3.1"}),
    order_control = msg:get("ORC-1"),
    order_status = first(msg, {"ORC-5"}),
    mrn = M.mrn(msg),
    patient = patient or json.null,
    patient_class = first(msg, {"PV1-2"}),
    procedure = {
      code = first(msg, {"OBR-4.1", "IPC-7.1"}),
      text = first(msg, {"OBR-4.2", "IPC-7.2"}),
      system = first(msg, {"OBR-4.3", "IPC-7.3"}),
    },
    modality = first(msg, {"OBR-24", "IPC-5.1"}),
    priority = M.priority(msg),
    reason = first(msg, {"OBR-31.2", "OBR-31.1", "OBR-13"}),
    ordering_provider = provider and {
      id = provider,
      family = first(msg, {"ORC-12.2", "OBR-16.2"}),
      given = first(msg, {"ORC-12.3", "OBR-16.3"}),
    } or json.null,
    study_uid = first(msg, {"ZDS-1.1", "IPC-3.1"}),
    ordered_at = first(msg, {"ORC-9", "MSH-7"}),
    scheduled_at = first(msg, {"TQ1-7.1", "ORC-7.4", "OBR-27.4", "OBR-7", "OBR-6"}),
  }
end

return M
